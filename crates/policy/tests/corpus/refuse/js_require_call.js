// expect: javascript.process
require.call(null, 'child_process').execSync('id');
