"""Operator commands: the command line, control commands, status, replay."""
