"""Ray job entry point: `cema-ray run` as a script, for `ray job submit --working-dir . -- python jobs/adapt.py ...`.

Standalone it starts its own local Ray when the config's runtime needs one; under `ray job submit`
(RAY_ADDRESS set) it connects to that cluster and passes no resource arguments to ray.init.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds cema_ray

from cema_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
