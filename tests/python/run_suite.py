"""Runs one Python test module against the worker binary given; exits 77 (CTest: skipped), with a
message saying what is missing, when the Python packages it needs are not installed.

    run_suite.py --worker build/bin/pkv-worker client_test grpc numpy persistentkv
"""

import argparse
import importlib
import os
import sys
import unittest

SKIP = 77


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, help="pkv-worker binary")
    parser.add_argument("module", help="test module in this folder")
    parser.add_argument("needs", nargs="*", help="Python packages the module imports")
    args = parser.parse_args()
    missing = []
    for name in args.needs:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    if missing:
        print(f"SKIPPED {args.module}: {sys.executable} lacks {', '.join(missing)}; "
              "scripts/setup.sh installs them into .venv", flush=True)
        return SKIP
    os.environ["PKV_WORKER_BIN"] = args.worker
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    suite = unittest.defaultTestLoader.loadTestsFromName(args.module)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
