"""Layer 4, checkpoints: Orbax trees and training checkpoints (checkpoint), model directories
(pretrained), conversion from PyTorch state dicts (convert) and warm starts (initialize)."""
