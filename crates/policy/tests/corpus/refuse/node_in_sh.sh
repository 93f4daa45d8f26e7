# expect: javascript.process
sh -c "node -e \"require('child_process').execSync('id')\""
