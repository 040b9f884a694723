"""Build the tiny easy-VQA LLaVA from nothing: word-level tokenizer, processor, config, model."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlm_sparsify.tiny.easyvqa_data import COLORS, SHAPES

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = SPECIAL_TOKENS
# Every word of easy-VQA's questions and answers, the prompt frame and the caption request.
WORDS = (
    ("user", "assistant", ":", "?", ".", "yes", "no")
    + COLORS
    + SHAPES
    + ("a", "color", "contain", "does", "image", "in", "is", "not", "of", "present", "shape")
    + ("the", "there", "what", "describe")
)
# LLaVA-1.5's format; `<image>` is expanded by the processor to one token per patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """Sizes of the tiny LLaVA (defaults: the shipped model)."""

    image_size: int = 64
    patch_size: int = 8
    """8 px patches: 64 image tokens. At 16 px (16 tokens) shape learning was slow and varied
    between runs (docs/tiny_model.md)."""
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 256
    max_positions: int = 128
    tie_embeddings: bool = True
    """Share the input embedding and the output head: a question's colour word and the colour the
    model would answer then live in one space, which makes yes/no matching easy to learn."""

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lower-cased tokenizer over easy-VQA's words; prepends `<s>`."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # WordPiece's clean-up joins " ." and " ?" back onto the previous word.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(shape: TinyShape = TinyShape()) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(shape: TinyShape = TinyShape()) -> LlavaConfig:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
        projection_dim=shape.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_heads,
        max_position_embeddings=shape.max_positions,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        tie_word_embeddings=shape.tie_embeddings,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab[IMAGE],
        image_seq_length=shape.num_image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=shape.tie_embeddings,
    )


def build_model(shape: TinyShape = TinyShape()) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny LLaVA with generation set to greedy, stopping at `</s>`."""
    config = build_config(shape)
    model = LlavaForConditionalGeneration(config)
    text = config.get_text_config()
    generation = model.generation_config
    generation.bos_token_id = text.bos_token_id
    generation.eos_token_id = text.eos_token_id
    generation.pad_token_id = text.pad_token_id
    generation.do_sample = False
    generation.max_new_tokens = 8
    return model
