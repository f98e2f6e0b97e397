"""fastdpo.trl.DPOTrainer on a saved tiny model, for tests/test_trl.py's torchrun test.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/trl_torchrun.py \
        MODEL_DIR OUTPUT_DIR --batch-size 2

trains 3 steps of SGD on the first 4 pairs of lm_helpers.PAIRS (every step sees all of them when
the global batch is 4), then writes the model (save_pretrained) and ``run.json`` (the number of processes and
TRL's log history) to OUTPUT_DIR from the main process. The reference model is loaded by TRL from MODEL_DIR.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # lm_helpers, trl_helpers, as a script


def run(model_dir: str, output_dir: str, batch_size: int):
    from datasets import Dataset
    from lm_helpers import PAIRS
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import sgd_config

    from fastdpo.trl import DPOTrainer

    args = sgd_config(output_dir, per_device_train_batch_size=batch_size, lr_scheduler_type="constant")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(PAIRS[:4]),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    trainer.save_model(output_dir)  # the main process only
    if trainer.is_world_process_zero():
        record = {
            "num_processes": trainer.accelerator.num_processes,
            "log_history": trainer.state.log_history,
        }
        (pathlib.Path(output_dir) / "run.json").write_text(json.dumps(record))
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--batch-size", type=int, required=True)
    options = parser.parse_args()
    run(options.model_dir, options.output_dir, options.batch_size)
