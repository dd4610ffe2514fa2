"""The `gptbert` command line: one module per group of subcommands, each calling the library."""
