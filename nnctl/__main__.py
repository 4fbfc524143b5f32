"""`python -m nnctl` (and `torchrun -m nnctl`)."""

from nnctl.cli.app import run

if __name__ == "__main__":
    run()
