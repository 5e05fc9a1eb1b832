"""``python -m finetune_client``: the ``ftj`` command."""

import sys

from finetune_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
