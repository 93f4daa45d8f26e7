cat data.csv | grep -v '^#' | sort | head -n 20
