"""data/convert.py's work, and nothing else imports it: public datasets to AT-KD's files.

`datasets` reads each public layout (and generic JSONL/CSV), `splitting` makes the seeded split
into iteration pools and an evaluation set, `conversion` plans the output files and the report.
"""
