"""Agentic RL: a sandbox per episode, three tools (bash, str_replace, finish), buggy repos."""
