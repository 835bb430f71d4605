"""The engine floor: scheduler, KV-cache bookkeeping, model runner and the step loop."""
