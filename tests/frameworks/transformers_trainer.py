"""The transformers Trainer on CPU: a tiny BERT built from its config (no download)."""

from __future__ import annotations

import tempfile

import torch
from _report import report
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments


class Synthetic(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": torch.tensor(i % 2)}


def main() -> None:
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    model = BertForSequenceClassification(config)
    trainer = Trainer(model=model, args=args, train_dataset=Synthetic())
    result = trainer.train()
    report(
        framework="transformers",
        parallel_mode=str(args.parallel_mode),
        rank=args.process_index,
        world_size=args.world_size,
        local_rank=args.local_process_index,
        steps=result.global_step,
        loss=result.training_loss,
        finished=True,
    )


if __name__ == "__main__":
    main()
