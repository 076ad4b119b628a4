"""What each task of the `bigquery_backfill` DAG does. The DAG file only declares tasks that call these."""
