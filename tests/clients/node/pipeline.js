// Drives the npm faktory-worker client against FAKTORY_URL. One pooled connection gets N PUSHes,
// then N FETCHes, all sent before any reply is read (the library keeps a FIFO of pending replies),
// then the library's ordinary push/fetch/ack. Prints what came back as JSON.
const faktory = require("faktory-worker");

async function main() {
  const [queue, count] = [process.argv[2], parseInt(process.argv[3], 10)];
  const client = await faktory.connect({ url: process.env.FAKTORY_URL });
  const conn = await client.pool.acquire();
  const pushes = [];
  for (let i = 0; i < count; i++) {
    const job = { jid: `node-${queue}-${i}`, jobtype: "NodeJob", args: [i], queue };
    pushes.push(conn.send(["PUSH", JSON.stringify(job)]));
  }
  const pushReplies = await Promise.all(pushes);
  const fetches = [];
  for (let i = 0; i < count; i++) fetches.push(conn.send(["FETCH", queue]));
  const fetched = (await Promise.all(fetches)).map((reply) => JSON.parse(reply).args[0]);
  await client.pool.release(conn);

  await client.push({ jobtype: "NodeJob", queue, args: ["library"] });
  const job = await client.fetch(queue);
  await client.ack(job.jid);
  console.log(JSON.stringify({ pushReplies, fetched, library: job.args }));
  await client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
