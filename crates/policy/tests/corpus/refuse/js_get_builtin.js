// expect: javascript.process
process.getBuiltinModule('node:child_process').execSync('id');
