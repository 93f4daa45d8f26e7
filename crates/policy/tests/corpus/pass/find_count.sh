find . -name '*.py' -exec wc -l {} +
