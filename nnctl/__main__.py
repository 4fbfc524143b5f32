"""`python -m nnctl` (and `torchrun -m nnctl`)."""

from nnctl.cli.app import main

if __name__ == "__main__":
    main()
