"""Dataset converters for ``python -m data.make_shards <subcommand>``.

Every module in this package that defines ``add_parser(subparsers)`` is discovered automatically
by ``data/make_shards.py``. The function registers one (or more) subcommands::

    def add_parser(subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser("images", help="...")
        parser.add_argument(...)
        parser.set_defaults(func=run)      # run(args: argparse.Namespace) -> int | None

Converters write shards with ``sapiens.data.shard_writer.open_shard_writer`` in the schemas listed in
sapiens/data/readers.py and raise ``ValueError`` / ``FileNotFoundError`` with a message naming the bad
input; the dispatcher prints those as one-line errors (exit status 2).
"""
