ls -la | wc -l
