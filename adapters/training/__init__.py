"""Training: one adapter (`trainer`), a hypernetwork over several tasks (`hyper`), their data and CLI.

The serving core never imports this package; it depends on the core (the same banks and forward
serving runs), never the other way round.
"""
