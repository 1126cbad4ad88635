"""The Twisted shell: sockets, threads, timers. Thin: the logic lives in engine.core."""
