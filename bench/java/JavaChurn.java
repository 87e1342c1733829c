// The bench's JVM workload (java-churn): the churn of bench/src/bin/
// loadgen.rs, from a JVM, so that the cost of walking and naming a JVM's
// stack (deeper than a native one: Socket.connect goes through a dozen
// JDK frames) can be measured. Speaks loadgen's client protocol: READY on
// stderr, waits for a line on stdin, then connects, writes 8 bytes and
// closes, round robin over 127.0.0.1..127.0.0.N:PORT from T threads, for
// S seconds, and prints one JSON result line on stdout.
//
// usage: JavaChurn --port P [--addrs N] [--threads T] [--duration S]

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.util.concurrent.atomic.AtomicLong;

public class JavaChurn {
    public static void main(String[] args) throws Exception {
        int port = 0, addrs = 64, threads = 2;
        double duration = 5;
        for (int i = 0; i + 1 < args.length; i += 2) {
            switch (args[i]) {
                case "--port": port = Integer.parseInt(args[i + 1]); break;
                case "--addrs": addrs = Integer.parseInt(args[i + 1]); break;
                case "--threads": threads = Integer.parseInt(args[i + 1]); break;
                case "--duration": duration = Double.parseDouble(args[i + 1]); break;
                default: throw new IllegalArgumentException("unknown option " + args[i]);
            }
        }
        if (port == 0) {
            throw new IllegalArgumentException("--port is required");
        }
        InetSocketAddress[] targets = new InetSocketAddress[addrs];
        for (int i = 0; i < addrs; i++) {
            byte[] a = {127, 0, 0, (byte) (1 + i)};
            targets[i] = new InetSocketAddress(InetAddress.getByAddress(a), port);
        }
        System.err.println("READY");
        new BufferedReader(new InputStreamReader(System.in)).readLine();

        AtomicLong connections = new AtomicLong();
        AtomicLong errors = new AtomicLong();
        long start = System.nanoTime();
        long end = start + (long) (duration * 1e9);
        Thread[] workers = new Thread[threads];
        for (int t = 0; t < threads; t++) {
            int first = t;
            workers[t] = new Thread(() -> churn(targets, first, end, connections, errors));
            workers[t].start();
        }
        for (Thread w : workers) {
            w.join();
        }
        double seconds = (System.nanoTime() - start) / 1e9;
        System.out.printf(
                "{\"mode\":\"java-churn\",\"connections\":%d,\"seconds\":%.3f,\"conn_per_sec\":%.1f,\"errors\":%d,\"threads\":%d}%n",
                connections.get(), seconds, connections.get() / seconds, errors.get(), threads);
    }

    static void churn(InetSocketAddress[] targets, int next, long end, AtomicLong connections, AtomicLong errors) {
        byte[] payload = new byte[8];
        while (System.nanoTime() < end) {
            next = (next + 1) % targets.length;
            try (Socket s = new Socket()) {
                s.connect(targets[next]);
                OutputStream out = s.getOutputStream();
                out.write(payload);
                connections.incrementAndGet();
            } catch (Exception e) {
                errors.incrementAndGet();
            }
        }
    }
}
