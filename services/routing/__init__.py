"""routing: where each job runs (policy.py), placing it there (placement.py), and what that takes."""

SERVICE = "routing"  # the name its events, spans and durable consumers carry
