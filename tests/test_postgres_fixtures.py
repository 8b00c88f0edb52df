"""The throwaway cluster itself: it answers on loopback and hands out empty databases."""

from __future__ import annotations

import psycopg

pytest_plugins = ["tests.postgres_fixtures"]


def test_the_cluster_answers_on_loopback(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:")
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT current_database()").fetchone() == ("spectra",)


def test_fresh_databases_are_distinct_and_empty(postgres_url: str) -> None:
    from tests.postgres_fixtures import fresh_database

    first, second = fresh_database(postgres_url), fresh_database(postgres_url)
    assert first != second
    with psycopg.connect(first) as connection:
        assert connection.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
