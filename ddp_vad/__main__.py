"""``python -m ddp_vad`` and ``accelerate launch -m ddp_vad`` entry point."""

from ddp_vad.cli import main

if __name__ == "__main__":
    main()
