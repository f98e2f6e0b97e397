"""The TRL ``DPOConfig`` of the tests that run ``fastdpo.trl.DPOTrainer`` and TRL's own trainer
(tests/test_trl.py, and tests/trl_torchrun.py for its torchrun test), so that runs compared with
each other are configured alike."""

from __future__ import annotations


def sgd_config(output_dir: str, **options):
    """3 steps of plain SGD at learning rate 0.1, float32 on the CPU, one log line per step,
    nothing saved or reported, no gradient checkpointing; ``options`` override or add to these.

    Plain SGD: an update is then the gradient times the learning rate, so comparing updates
    compares gradients. (Adam divides each gradient by its running scale, which turns float32
    rounding in a near-zero gradient into a step of up to the learning rate.)
    """
    from trl import DPOConfig

    defaults = dict(
        max_steps=3,
        optim="sgd",
        learning_rate=0.1,
        bf16=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
    )
    return DPOConfig(output_dir=output_dir, **(defaults | options))
