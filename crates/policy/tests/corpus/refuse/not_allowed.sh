# expect: command.not-allowed
perl -e 'system("id")'
