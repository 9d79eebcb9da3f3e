"""`python -m tasks.training JOB.json`: one error line for the stage, the traceback in the log above it."""

import sys
import traceback
from pathlib import Path

from tasks.training.loop import main
from tasks.training.process import emit

try:
    main(Path(sys.argv[1]))
except Exception as err:
    traceback.print_exc()
    hint = "; lower train.batch_size or enable train.gradient_checkpointing" if "out of memory" in str(err) else ""
    emit("error", message=f"training failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}{hint}")
    sys.exit(1)
