"""certgate's benchmark suite (``make bench``): real components on loopback, each figure
measured beside its anchor (HAProxy, stunnel, a plain TCP relay) in the same run."""
