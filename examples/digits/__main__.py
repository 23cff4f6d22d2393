"""``python -m examples.digits [LightningCLI arguments]``; with no arguments, the main job (see :mod:`.cli`)."""

from examples.digits.cli import main

if __name__ == "__main__":
    main()
