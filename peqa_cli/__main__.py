"""``python -m peqa_cli`` (and ``accelerate launch -m peqa_cli finetune ...``)."""

from peqa_cli.cli import main

main()
