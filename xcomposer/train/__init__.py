"""LoRA fine-tuning of InternLM decoders with peft (docs/finetune.md).

    from xcomposer.train import finetune, FinetuneConfig
    result = finetune(FinetuneConfig(folder="internlm2_5-7b-chat", data="train.jsonl", out="my-lora"))
    model = InternLM.from_pretrained("internlm2_5-7b-chat", adapter="my-lora")
    merge_checkpoint("internlm2_5-7b-chat", "my-lora", "my-model")     # a merged checkpoint folder
"""
from .data import DataError, load_examples, parse_record
from .lora import save_adapter
from .merge import MergeReport, merge_checkpoint
from .trainer import FinetuneConfig, FinetuneResult, finetune

__all__ = ["finetune", "FinetuneConfig", "FinetuneResult", "DataError", "load_examples", "parse_record",
           "save_adapter", "merge_checkpoint", "MergeReport"]
