"""Hydra configs of erc-verl, installed as the package ``erc_verl.configs`` (see pyproject.toml)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
