// Test fixture for the tracer's JVM integration tests (tests/tests/java.rs):
// a metadata-like HTTP server on 127.0.0.1 that answers every request with
// 404 and a small body, then closes the connection, so that a client that
// never reads nor closes the error body is left with a socket in CLOSE_WAIT
// holding unread bytes.
//
// Prints `PORT <port>` once it listens. Runs until killed.

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;

public class MetaServer {
    /** The 404 body: 26 bytes. */
    static final byte[] BODY = "{\"error\":\"key not found\"}\n".getBytes(StandardCharsets.US_ASCII);

    public static void main(String[] args) throws Exception {
        if (BODY.length != 26) {
            throw new AssertionError("body is " + BODY.length + " bytes");
        }
        InetSocketAddress any = new InetSocketAddress(InetAddress.getByName("127.0.0.1"), 0);
        HttpServer server = HttpServer.create(any, 64);
        server.createContext("/", MetaServer::notFound);
        server.start();
        System.out.println("PORT " + server.getAddress().getPort());
        System.out.flush();
    }

    static void notFound(HttpExchange exchange) throws IOException {
        try (exchange) {
            exchange.getRequestBody().readAllBytes();
            // `Connection: close`: the server closes the connection after
            // the response, so the client's socket gets a FIN.
            exchange.getResponseHeaders().set("Connection", "close");
            exchange.getResponseHeaders().set("Content-Type", "application/json");
            exchange.sendResponseHeaders(404, BODY.length);
            OutputStream body = exchange.getResponseBody();
            // The headers go first, the body a moment later: the client has
            // parsed the headers by then, so the body stays in the kernel's
            // receive queue (visible as ss Recv-Q) instead of in the
            // client's read buffer.
            body.flush();
            try {
                Thread.sleep(100);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            body.write(BODY);
            body.flush();
        }
    }
}
