// expect: javascript.process
require('child_process').execSync('id')
