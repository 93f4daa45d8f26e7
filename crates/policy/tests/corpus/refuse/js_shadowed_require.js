// expect: javascript.process
function load(require) { return require; }
require('child_process').execSync('id');
