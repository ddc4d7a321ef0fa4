"""Translation between the OpenAI API and backend wire formats. Pure functions: no I/O."""
