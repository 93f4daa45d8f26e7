// expect: javascript.process
import('node:child_process').then((cp) => cp.execSync('id'));
