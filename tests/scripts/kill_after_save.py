"""Train the resume-test configuration and SIGKILL this process right after checkpoint STEP is written.

python tests/scripts/kill_after_save.py OUTPUT_DIR STEP
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _tiny  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class KillOnSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):  # runs after the checkpoint folder is complete
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    trainer = _tiny.make_trainer(sys.argv[1], callbacks=[KillOnSave(int(sys.argv[2]))], **_tiny.RESUME_CONFIG)
    trainer.train()
    print("not killed", file=sys.stderr)
    sys.exit(3)
