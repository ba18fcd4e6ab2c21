"""Agents: the agentic system's turn loop, its tools (a sandboxed code interpreter among them)
and its shields, reaching the engine through small typed interfaces."""
