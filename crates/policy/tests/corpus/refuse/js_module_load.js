// expect: javascript.process
module.constructor._load('child_process').execSync('id');
