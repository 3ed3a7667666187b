"""The pure decision core: caps, budget, the planner, the grid order book, the dead band.

Nothing here reads a clock, logs, awaits or touches a socket or a file: state and time come
in as plain frozen values, actions and limits go out. That is what lets the decisions be
tested exhaustively without a farm, and replayed exactly from a recorded snapshot.
"""
