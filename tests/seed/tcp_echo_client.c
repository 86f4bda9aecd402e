/* From the seed tutorial, "Socket Programming in C" > TCP Echo > client.c */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#define SERVER_ADDRESS "127.0.0.1"
#define SERVER_PORT 50000
#define BUFFER_SIZE 4096
#define MSG "hello world"

int main(int argc, char *argv[])
{
    int ret, client_sock, total;
    struct sockaddr_in server_addr;
    char buffer[BUFFER_SIZE];
    unsigned int msg_len;

    // create a socket
    client_sock = socket(AF_INET, SOCK_STREAM, IPPROTO_TCP);
    if (client_sock < 0) {
        perror("socket() failed");
        exit(1);
    }

    // construct a server socket address
    memset(&server_addr, 0, sizeof(server_addr));
    server_addr.sin_family = AF_INET;
    server_addr.sin_addr.s_addr = inet_addr(SERVER_ADDRESS);
    server_addr.sin_port = SERVER_PORT;

    // connect to the server
    ret = connect(client_sock, (struct sockaddr *)&server_addr,
                  sizeof(server_addr));
    if (ret < 0) {
        perror("connect() failed");
        exit(1);
    }

    // send a message to the server
    msg_len = strlen(MSG);
    ret = send(client_sock, MSG, msg_len, 0);
    if (ret != msg_len) {
        perror("send()");
        exit(1);
    }

    // receive a message from the server
    total = 0;
    while (total < msg_len) {
        ret = recv(client_sock, buffer, BUFFER_SIZE - 1, 0);
        if (ret <= 0) {
            perror("recv() failed or connection closed");
            exit(1);
        }
        total += ret;
        buffer[ret] = '\0';
        printf(buffer);
    }
    printf("\n");

    // close the socket
    close(client_sock);

    return 0;
}
