# expect: javascript.process
env NODE_ENV=production nodejs --eval='require("child_process").execSync("id")'
