"""Operations: the command line, configuration, status, queries over the lake, reports."""
