// expect: javascript.process
require('child_' + 'process').spawnSync('id', { stdio: 'inherit' });
