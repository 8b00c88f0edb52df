"""Offline byte-level tokenizer shared by every embedded and test model.

Ids 0-255 are the 256 byte values (id == byte value) and there are no merges, so any
UTF-8 string (emoji, newlines, ...) encodes to one token per byte and decodes back exactly.
The special tokens follow in a fixed order::

    256 <|bos|>   257 <|eos|>   258 <|pad|>   259 <|im_start|>   260 <|im_end|>

``eos_token`` is ``<|eos|>`` (the end of a plain completion), not ``<|im_end|>``: keeping
the two apart lets raw completions run past a chat marker they happen to contain. Chat
generations must still stop at ``<|im_end|>``, so :func:`byte_generation_config` lists both
ids as ``eos_token_id`` and ``generate`` stops on either.

Encoding with ``add_special_tokens=True`` (the default) prepends ``<|bos|>``. The chat
template does not emit ``<|bos|>`` itself: render it with ``tokenize=False`` and encode the
text normally to get exactly one. (``apply_chat_template(tokenize=True)`` encodes with
``add_special_tokens=False`` and therefore yields no ``<|bos|>``.)
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
BYTE_VOCAB_SIZE = 256
VOCAB_SIZE = BYTE_VOCAB_SIZE + len(SPECIAL_TOKENS)
MODEL_MAX_LENGTH = 4096

# Without tools this renders exactly as the original template did. With tools (``tools=`` in
# apply_chat_template) it lists them in a system turn (merged with a leading system message) and
# renders assistant tool calls and ``tool`` results in the Hermes convention (server/api/tool_calls.py).
CHAT_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    '{{ \'# Tools\\nCall a function by writing <tool_call>{"name": ..., "arguments": {...}}</tool_call>.\\n\' }}'
    "{% for tool in tools %}{{ tool | tojson + '\\n' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>' + {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson"
    " + '</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def special_token_id(token: str) -> int:
    """Fixed id of one of :data:`SPECIAL_TOKENS`."""
    return BYTE_VOCAB_SIZE + SPECIAL_TOKENS.index(token)


def _byte_to_char() -> dict[int, str]:
    # GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer and
    # decoder use; the vocabulary has to be keyed by these stand-ins.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(BYTE_VOCAB_SIZE) if byte not in table)
    for offset, byte in enumerate(shifted):
        table[byte] = chr(BYTE_VOCAB_SIZE + offset)
    return table


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the byte-level tokenizer from scratch; needs no files and no network."""
    vocab = {char: byte for byte, char in _byte_to_char().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # Without merges the regex split cannot change the tokens, only cost time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    bos_id = special_token_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        # Decoding must return the exact bytes, not "tidied" spacing around punctuation.
        clean_up_tokenization_spaces=False,
    )


def byte_generation_config() -> GenerationConfig:
    """Generation defaults for models using :func:`build_byte_tokenizer` (stops on eos or im_end)."""
    return GenerationConfig(
        bos_token_id=special_token_id(BOS_TOKEN),
        eos_token_id=[special_token_id(EOS_TOKEN), special_token_id(IM_END_TOKEN)],
        pad_token_id=special_token_id(PAD_TOKEN),
    )
