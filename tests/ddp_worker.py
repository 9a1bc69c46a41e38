"""Run by tests/test_training.py under torchrun: train, then save this rank's final weights."""
import os
import sys
from pathlib import Path

import torch

from medvae.training.config import load_config
from medvae.training.loop import train

out = Path(sys.argv[1])
result = train(load_config(None, sys.argv[2:]))
torch.save(result.model.state_dict(), out / f"rank{os.environ['RANK']}.pt")
