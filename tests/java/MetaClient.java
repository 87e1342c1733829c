// Test fixture for the tracer's JVM integration tests (tests/tests/java.rs):
// the motivating bug. An HttpURLConnection client asks a metadata server for
// a key, gets an HTTP error, and never reads nor closes the error stream:
// the connection's socket is never released, and once the server closes its
// side it sits in CLOSE_WAIT for as long as the JVM lives.
//
// Usage: MetaClient URL COUNT
// Prints `READY <pid>`, waits for one line on stdin (so that the tracer can
// attach first), makes COUNT requests (one connection each), printing
// `STATUS <code>` for each, then `done`, then sleeps until killed.
//
// The harness (tests/src/java.rs) finds lines by their end-of-line marker
// comments, never by number: CONNECT-LINE (the call that connects) and
// FETCH-CALL-LINE (main's call of fetchMetadata). Keep exactly one of each.

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.net.HttpURLConnection;
import java.net.URL;
import java.util.ArrayList;
import java.util.List;

public class MetaClient {
    /** Every connection ever opened: reachable, so GC never closes one. */
    static final List<HttpURLConnection> CONNECTIONS = new ArrayList<>();

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: MetaClient URL COUNT");
            System.exit(2);
        }
        String url = args[0];
        int count = Integer.parseInt(args[1]);
        System.out.println("READY " + ProcessHandle.current().pid());
        System.out.flush();
        BufferedReader stdin = new BufferedReader(new InputStreamReader(System.in));
        if (stdin.readLine() == null) {
            return;
        }
        for (int i = 0; i < count; i++) {
            int status = fetchMetadata(url); // FETCH-CALL-LINE
            System.out.println("STATUS " + status);
        }
        System.out.println("done");
        System.out.flush();
        Thread.sleep(Long.MAX_VALUE);
    }

    /** One request; the bug is what it does not do on an error status. */
    static int fetchMetadata(String url) throws IOException {
        HttpURLConnection conn = (HttpURLConnection) new URL(url).openConnection();
        conn.setUseCaches(false);
        CONNECTIONS.add(conn);
        int status = conn.getResponseCode(); // CONNECT-LINE
        if (status >= 400) {
            // BUG: getErrorStream() is neither read nor closed, and the
            // connection is never disconnected.
            return status;
        }
        try (InputStream in = conn.getInputStream()) {
            in.readAllBytes();
        }
        return status;
    }
}
