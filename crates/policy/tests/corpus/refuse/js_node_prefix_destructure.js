// expect: javascript.process
const { execSync: run } = require('node:child_process');
run('id');
