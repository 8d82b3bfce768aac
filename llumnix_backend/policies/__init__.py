"""Llumnix's decisions, as pure functions over immutable snapshots and views (no I/O, no clock
of their own): where a request goes (`dispatch`), which running requests move
(`rescheduling`), and what a model's control loop does each tick (`control`)."""
